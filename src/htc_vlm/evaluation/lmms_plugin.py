"""lmms-eval model plugin (``pip install 'htc-vlm[eval]'``)::

    lmms-eval --model htc_vlm --model_args pretrained=DIR,method=model,vq=TOKENIZER_DIR --tasks gqa

Registered through the ``lmms_eval.models`` entry point (a ``ModelManifest``). Each document's
image is compressed once into a visual cache and every request on that document is answered from
it: ``generate_until`` greedily up to the ``until`` strings, ``loglikelihood`` by scoring the
continuation after the context. ``htc`` / ``discrete`` models need q: ``vq=`` (a tokenizer folder,
computed on the fly) or ``features=`` (a store keyed ``"{task}/{split}/{doc_id}"``).
"""

from __future__ import annotations

import torch
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from transformers import AutoTokenizer

from ..data.images import to_rgb
from ..data.llava import PromptBuilder, get_template
from ..errors import HTCError
from ..inference import ImageEncoder
from ..layout import left_pad
from ..methods import load_for_method

IMAGE = "<image>"


class HTCLmms(lmms):
    is_simple = True

    def __init__(self, pretrained: str, method: str = "model", vq: str | None = None, features: str | None = None,
                 template: str | None = None, image_norm: str | None = None, resize: bool = True, max_new_tokens: int = 32,
                 **kwargs):
        super().__init__()
        from ..vq.model import MultiGroupVQ
        from ..vq.store import FeatureStore

        self.model = load_for_method(pretrained, method)
        if not self.model.reuses_image_cache:
            raise HTCError(f"method {method!r} chooses tokens per question and has no compress-once cache; "
                           f"evaluate it with `htc-vlm eval --method {method}`")
        self.tok = AutoTokenizer.from_pretrained(pretrained)
        store = FeatureStore(features, expected_dim=self.model.config.discrete_dim) if features else None
        self.encoder = ImageEncoder(self.model, store, MultiGroupVQ.load(vq) if vq else None, image_norm,
                                    str(resize).lower() in ("1", "true", "yes"))
        self.builder = PromptBuilder(self.tok, get_template(template or self.model.config.chat_template),
                                     self.model.config)
        self.max_new_tokens = int(max_new_tokens)
        self._caches: dict[tuple, object] = {}

    def _cache(self, doc_to_visual, doc_id, task, split):
        """The visual cache of one document's (first) image, made once."""
        key = (task, split, doc_id)
        if key not in self._caches:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            if not visuals:
                raise HTCError(f"{task}/{split}/{doc_id}: no image; htc-vlm answers about one image")
            img = self.encoder.processing.check(to_rgb(visuals[0]), f"{task}/{split}/{doc_id}")
            pix, q = self.encoder.encode([f"{task}/{split}/{doc_id}"], [img])
            self._caches[key] = self.model.compress(pix, q, prefix_ids=self.builder.prefix_ids())
        return self._caches[key]

    def _question(self, context: str) -> list[int]:
        return self.builder.question_ids(context.replace(IMAGE, "").strip())

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            cache = self._cache(doc_to_visual, doc_id, task, split)
            ids, mask = left_pad([self._question(context)], self.tok.pad_token_id)
            gen = self.model.generate(ids, visual_cache=cache, attention_mask=mask, do_sample=False,
                                      max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                                      eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.pad_token_id)
            text = self.tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
            for stop in gen_kwargs.get("until", []) or []:
                text = text.split(stop)[0]
            out.append(text.strip())
        return out

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target(doc) if callable(doc_to_target) else doc_to_target
            cache = self._cache(doc_to_visual, doc_id, task, split)
            ctx = self._question(context)
            cont = self.tok(str(continuation), add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            logits = self.model(**self.model.answer_inputs(cache, ids)).logits[0, len(ctx) - 1:-1]  # (C, V)
            logp = logits.log_softmax(-1)
            target = torch.tensor(cont)
            out.append((float(logp.gather(-1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all())))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("htc-vlm does not implement multi-round generation for lmms-eval yet")


manifest = ModelManifest(model_id="htc_vlm", simple_class_path="htc_vlm.evaluation.lmms_plugin.HTCLmms")
