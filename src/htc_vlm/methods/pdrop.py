"""PyramidDrop (Xing et al. 2024, "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction"): the model is split into stages at layers 8, 16, 24 (of 32);
at the end of each stage the visual tokens are ranked by the attention of the last instruction
token and a fixed share is kept. The paper keeps lambda = 0.5 per stage; to meet a token budget we
fall geometrically so that the last stage keeps exactly ``budget`` tokens. Options: ``layers``
(given for 32 layers, scaled to the model) as ``--option layers=8,16,24``."""

from .layerwise import QuestionAwareVLM, keep_top, last_token_scores, scaled_layers
from .registry import Method, register, upper_bound


class PDrop(QuestionAwareVLM):
    def __init__(self, model, budget, layers: tuple[int, ...] = (8, 16, 24)):
        super().__init__(model, budget)
        n = model.config.text_config.num_hidden_layers
        self.prune_at(tuple(max(0, x - 1) for x in scaled_layers(layers, n)))

    def select(self, layer, attn, kept, visual, text, query):
        return keep_top(last_token_scores(attn, query, visual), kept, self.counts[layer])


METHOD = register(Method(
    name="pdrop", kind="training-free", tables=("2",),
    paper="Xing et al. 2024, PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction",
    summary="drop visual tokens stage by stage, ranked by the last instruction token",
    options={"layers": (8, 16, 24)},
    load=lambda path, budget, options: PDrop(upper_bound(path), budget, **options),
))
