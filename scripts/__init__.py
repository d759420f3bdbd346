"""The repository's maintenance scripts (data builders, evaluations, fixture recorders).

Most run as files (``python scripts/build_tasks.py ...``) and import only installed packages;
a script that also needs the tests' helpers runs as a module from the repository root
(``python -m scripts.record_engine_fixtures``), where ``tests`` is importable as a namespace
package. Not part of the installed ``ipa_fast`` package.
"""
