"""CLEAR scripted module for 3D Slicer.

The engine (`CLEARLib`) holds every behaviour; this file registers the module with Slicer. The
widget (volume, model, Run, attention navigator, lesion seeds, key-slice annotation) is not part of
this version yet.
"""

from slicer.ScriptedLoadableModule import ScriptedLoadableModule


class CLEAR(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CLEAR"
        self.parent.categories = ["Quantification"]
        self.parent.dependencies = []
        self.parent.contributors = ["CLEAR developers"]
        self.parent.helpText = (
            "Patient-level CT predictions from a frozen 2D slice encoder and attention-MIL, with the "
            "per-slice attention shown beside the slice views, and 3D lesion predictions from a seed."
        )
        self.parent.acknowledgementText = (
            "Methods: CLEAR (abnormality-driven representation learning for radiology imaging) and "
            "FMCIB (foundation model for cancer imaging biomarkers, Pai et al.)."
        )
