"""A minimal Django project: one view that touches ``request.FILES`` (Django's default path)."""
