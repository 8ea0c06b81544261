"""The teacher registry: name -> TeacherEntry."""

from __future__ import annotations

from dkdm_cli.registry import Registry
from dkdm_cli.teachers.base import TeacherEntry

TEACHERS: Registry[TeacherEntry] = Registry("teacher")


def register_teacher(entry: TeacherEntry) -> TeacherEntry:
    """Add a teacher entry under its name."""
    TEACHERS.register(entry.name)(lambda: entry)
    return entry

