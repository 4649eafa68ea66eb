"""A minimal Django project for the adapter's tests: one app (this package),
a model with an ImageField and a FileField, a ModelForm, and views written the
way any Django app writes them (nothing uploadkit-specific but the decorator
and the ``.uploadkit`` attribute they report).

Its directory comes from ``UPLOADKIT_DJANGO_DIR`` (database, media, temp files),
so a test process and a gunicorn subprocess share it.
"""
