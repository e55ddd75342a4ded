"""Training side: encoders, the trainable indexing layer, losses, trainer and evaluation.
Depends on `index` (artifact format, builder), never on `service`."""
