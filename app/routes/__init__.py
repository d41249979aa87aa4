"""HTTP routes: JSON API under /api, HTML pages elsewhere."""
