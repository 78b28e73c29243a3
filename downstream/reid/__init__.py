"""Person re-identification on top of a pretrained encoder: the strong-baseline model (BNNeck), its
losses, the P x K sampler, Market-1501 metrics, k-reciprocal re-ranking, and galleries embedded into the
faiss retrieval index of ``twinview.index`` (``search.py``)."""
