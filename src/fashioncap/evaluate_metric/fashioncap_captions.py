"""fashioncap's caption metrics as a Hugging Face `evaluate` metric.

    import evaluate
    import fashioncap
    metric = evaluate.load(fashioncap.EVALUATE_METRIC)                  # with METEOR (needs Java)
    metric = evaluate.load(fashioncap.EVALUATE_METRIC, "no-meteor")     # without
    metric.compute(predictions=["a red dress"], references=[["A red dress.", "a red gown"]],
                   attributes="conf/attributes.yaml")                    # optional: attribute scores

Returns the dict the pipeline writes (bleu_1..bleu_4, cider_d, rouge_l, meteor): COCO's PTB
tokenisation and pycocoevalcap's formulas, computed by fashioncap.scoring, offline.
"""

import datasets
import evaluate

from fashioncap import scoring

_DESCRIPTION = ("BLEU-1..4, CIDEr-D, ROUGE-L and METEOR 1.5 of captions against one or more references each, "
                "on the official COCO caption tokens (Stanford PTBTokenizer 3.4.1 rules, in Python).")
_KWARGS = """
Args:
    predictions: list of captions, one per item.
    references: per item, a reference caption or a list of reference captions.
    attributes: optional path of an attribute vocabulary (the project's conf/attributes.yaml): adds
        attr/<type>/precision, recall and f1.
Returns:
    bleu_1, bleu_2, bleu_3, bleu_4, cider_d, rouge_l and (unless loaded as "no-meteor") meteor.
"""


class FashioncapCaptions(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references, attributes=None):
        refs = [[r] if isinstance(r, str) else list(r) for r in references]
        return scoring.score(refs, list(predictions), meteor=self.config_name != "no-meteor", attributes=attributes)
