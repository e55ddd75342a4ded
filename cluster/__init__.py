"""Past one machine: sharded, replicated serving on Ray Serve and parallel indexing on Ray Data.

Needs the `cluster` extra (`pip install 'jointpq[cluster]'`: Ray); the single-process service
(`jointpq serve`) stays the default and never imports this package. Dependencies point one way:
cluster -> service, model, index.
"""
