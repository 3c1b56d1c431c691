"""The accuracy study's parts: its tasks (``tasks``), its network (``model``), the methods it compares (``methods``)
and its tables and plots (``report``). The command line is ``benchmarks/accuracy_study.py``."""
