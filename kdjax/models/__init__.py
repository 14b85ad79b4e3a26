"""kdjax model zoo. Every model is a Flax module ``model(x, *, train)`` returning logits and
exposing named features through :mod:`kdjax.models.features`; build any of them by name with
:func:`get`.
"""

from kdjax.models import cheap as cheap
from kdjax.models import cifar as cifar
from kdjax.models import cnn as cnn
from kdjax.models import conv as conv
from kdjax.models import embedding as embedding
from kdjax.models import inception as inception
from kdjax.models import ion as ion
from kdjax.models import lenet as lenet
from kdjax.models import maxout as maxout
from kdjax.models import mlp as mlp
from kdjax.models import mobile as mobile
from kdjax.models import server as server
from kdjax.models.batch_norm import BatchNorm
from kdjax.models.features import ModelOutput, apply_model, feature_names, sow_feature
from kdjax.models.registry import count_params, get, names, register, spec

__all__ = ["BatchNorm", "ModelOutput", "apply_model", "count_params", "feature_names", "get", "names",
           "register", "sow_feature", "spec"]
