"""Where the decoder layers come from during a forward pass.

(The memory-budgeted streamer arrives with the streaming issue; until then every layer stays resident.)
"""

from .weights import load_layer


class ResidentLayers:
    """All layers built once and kept: iterating yields them in order."""

    def __init__(self, model):
        m = model
        self.layers = [load_layer(m.ckpt, m.cfg, m.quant_config, m.backend, i) for i in range(m.cfg.n_layers)]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)


def make_layer_source(model, max_memory=None, quiet=True):
    return ResidentLayers(model)
