"""The LRP engine: rule configuration, rules as autograd functions, explanations.

`explain` and `component_relevance` live in `pxopt.lrp.explain` and hand the model to its
family (`pxopt.families.family_of`), which picks the engine: `pxopt.lrp.cnn` (module rules)
or `pxopt.lrp.vit` (AttnLRP). The `Explanation` type is in the leaf `pxopt.lrp.explanation`;
the rule functions other engines reuse live in `pxopt.lrp.rules`; the configuration format
in `pxopt.lrp.config`.
"""

from pxopt.lrp.config import RuleConfig, RuleSpec
from pxopt.lrp.explain import Explanation, check_explainable, component_relevance, explain

__all__ = ["Explanation", "RuleConfig", "RuleSpec", "check_explainable", "component_relevance", "explain"]
