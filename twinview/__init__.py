"""twinview: contrastive self-supervised learning for medical segmentation and person re-ID.

This package is the torch-free ground floor: data readers, configs, the model card, the run folder,
provenance and the retrieval protocol. Layers, each importing only the ones below it:
``twinview_cli`` -> ``downstream`` -> ``pretrain`` -> ``engine`` (the training kit) -> ``twinview``;
``apps`` -> ``twinview``.
"""

__version__ = "0.1.0"
