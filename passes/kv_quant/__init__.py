"""quantize-kv building blocks: the typed plan, the method strategies and the KLT maths."""
