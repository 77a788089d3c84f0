"""FastV (Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models"): after layer K, keep the ``budget`` visual tokens
the prompt's last token attended to most in layer K-1 (mean over heads) and drop the rest for all
later layers. Paper default K = 2 of 32 layers; here ``layer`` (default 2, scaled to the model's
depth) is configurable as ``--option layer=K``."""

from .layerwise import QuestionAwareVLM, keep_top, last_token_scores, scaled_layers
from .registry import Method, register, upper_bound


class FastV(QuestionAwareVLM):
    def __init__(self, model, budget, layer: int = 2):
        super().__init__(model, budget)
        n = model.config.text_config.num_hidden_layers
        k = max(1, scaled_layers((layer,), n)[0])  # at least one layer sees every token
        self.score_layers = (k - 1,)  # attention of layer K-1 decides what layers >= K see

    def select(self, layer, attn, kept, visual, text, query):
        return keep_top(last_token_scores(attn, query, visual), kept, self.budget)


METHOD = register(Method(
    name="fastv", kind="training-free", tables=("2",),
    paper="Chen et al. 2024, An Image is Worth 1/2 Tokens After Layer 2 (FastV)",
    summary="drop the visual tokens least attended by the last token after layer K",
    options={"layer": 2},
    load=lambda path, budget, options: FastV(upper_bound(path), budget, **options),
))
