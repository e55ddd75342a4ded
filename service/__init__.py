"""The retrieval service (FastAPI) and the `jointpq` command line, which sits on top of
`model` and `index` because it is the only layer allowed to depend on both."""
