"""The end-to-end demo: pipeline.py runs it, evaluate.py and baselines.py score it, report.py writes it up;
``medtune demo`` is parsed in cli.py."""
