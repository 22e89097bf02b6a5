"""Training (extra ``[train]``): one module per objective; imported only by ``taiyi train``."""
