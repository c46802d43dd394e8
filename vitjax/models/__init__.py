"""Model families. Every family module is imported here explicitly so its registrations run."""
from vitjax.models import mixers  # noqa: F401  (registers 'mhsa')
from vitjax.models import backbone  # noqa: F401  (registers the 'vit' block)
from vitjax.models import vit  # noqa: F401
from vitjax.models.registry import create_model, list_mixers, list_models  # noqa: F401
