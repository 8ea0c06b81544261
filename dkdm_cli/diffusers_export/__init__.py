"""`dkdm export --format diffusers`: a student as a diffusers pipeline folder that loads with
`DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)` and no dkdm (folder.py), its
components (components.py, pipeline.py) and the standalone code shipped with it (standalone.py)."""
