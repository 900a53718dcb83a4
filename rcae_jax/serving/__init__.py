"""Production use of a trained workdir: predict on new images, the jax.export
artefact and the standalone scorer (serve_export.py, which imports nothing of
this package so that it can be copied beside an artefact). Never imports
training/."""
