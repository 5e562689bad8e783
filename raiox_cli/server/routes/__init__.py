"""The HTTP routes, one APIRouter per module: api (the JSON API), ops (health and
metrics), pages (what a person looks at)."""
