"""Constants shared by the data layer, the model and scoring, defined once for the whole project.

A plain module with no imports, so `pipeline/`, `model/` and the light scoring path all read the same values
without pulling in each other's dependencies (torch, timm, DALI).
"""

# ODIR-5K label columns, in the order of data.xlsx and of every (N, 8) label / logit / probability matrix.
CLASSES = ("N", "D", "G", "C", "A", "H", "M", "O")
NUM_CLASSES = len(CLASSES)
CLASS_NAMES = {"N": "normal", "D": "diabetes", "G": "glaucoma", "C": "cataract",
               "A": "AMD", "H": "hypertension", "M": "myopia", "O": "other"}

# ImageNet normalisation (per channel, [0, 1] pixel units): what timm's ImageNet weights expect, and the fallback
# of model.net.backbone_norm for backbones whose registry entry names none.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
