"""The one builder: a validated profile — read from YAML, or made from CLI flags (`outrider.flags`) — becomes models
loaded where it places them, and engines over them for any registered strategy (`deployment.py`; the Ray side in
`actors.py`, where drafters go in `hosts.py`)."""
from outrider.build.deployment import Deployment, Env

__all__ = ["Deployment", "Env"]
