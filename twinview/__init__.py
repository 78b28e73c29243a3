"""twinview: contrastive self-supervised learning for medical segmentation and person re-ID.

Layers, each importing only the ones below it:
``apps`` -> ``downstream`` -> ``pretrain`` -> ``twinview.data`` (readers, synthetic data).
``twinview.cli`` sits on top and imports the others lazily, per subcommand.
"""

__version__ = "0.1.0"
