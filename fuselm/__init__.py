"""fuselm: knowledge fusion of language models (FuseLLM / FuseChat) as a resumable pipeline.

Stages talk through manifests on disk (see ``fuselm.artifacts``); each stage module is
readable top to bottom and the CLI (``fuselm.cli``) is the only layer doing wiring.
"""

__version__ = "0.1.0"
