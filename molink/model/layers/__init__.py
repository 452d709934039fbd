"""Building blocks shared by the architectures: norms, rotary embedding, MLPs, attention."""
