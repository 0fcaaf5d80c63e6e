"""Pure translation of the registry into what ztunnel receives: workloads, services and L4 policies.

No IO and no clock: every function here is a function of a registry snapshot and `TranslateOptions`.
"""

from ztcore.mesh.translate.mesh import TranslateOptions, Translation, translate
from ztcore.mesh.translate.policies import StatusMessage

__all__ = ["StatusMessage", "TranslateOptions", "Translation", "translate"]
