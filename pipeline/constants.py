"""Constants shared by the data layer, the model and scoring, defined once for the whole project.

A plain module with no imports, so `pipeline/`, `model/` and the light scoring path all read the same values
without pulling in each other's dependencies (torch, timm, DALI).
"""

# ODIR-5K label columns, in the order of data.xlsx and of every (N, 8) label / logit / probability matrix.
CLASSES = ("N", "D", "G", "C", "A", "H", "M", "O")
NUM_CLASSES = len(CLASSES)
CLASS_NAMES = {"N": "normal", "D": "diabetes", "G": "glaucoma", "C": "cataract",
               "A": "AMD", "H": "hypertension", "M": "myopia", "O": "other"}
# The two eyes of a patient, in the order of every (left, right) pair: sheet columns, file names, model inputs.
EYES = ("left", "right")

# The largest image sides any tool accepts from a checkpoint or ONNX metadata (px): a 2048 px input is 50 MB per
# image in fp32, and ODIR originals are ~2000 px tall. A larger value (a damaged or crafted file: img_px 20000 asked
# for 16.6 GB) is refused, naming it, before anything is allocated.
MAX_IMG_PX = 2048
MAX_PREPARE_PX = 4096

# ImageNet normalisation (per channel, [0, 1] pixel units): what timm's ImageNet weights expect, and the fallback
# of model.net.backbone_norm for backbones whose registry entry names none.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
