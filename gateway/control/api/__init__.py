"""HTTP handlers per resource; each module exposes `routes(app)`. Imports web, domain and store."""
