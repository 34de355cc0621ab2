"""Code that runs several stages: preparing a cohort, the end-to-end demo."""
