"""A predictor with the model taken out, for measuring the feed (bench/feed_throughput.py).

`StandInPredictor.run` answers at once with one fixed, confident prediction per post (every
task's first label, i.e. the negative one, at score 0.02; ITM 0.99 where there is an image), so
a worker serving it spends its CPU on everything but the forward: parsing, fetching, hashing,
dedupe, decoding, `prepare` (tokenising and resizing stay: they feed any real model),
serialising and producing. What that worker does per CPU-second is the ceiling any model can
reach on the host. Reached only through the worker's hidden `--stand-in-model` switch; never a
default, never served by a product path.
"""

from __future__ import annotations

from models.inference import Prediction, Predictor, PreparedBatch, TaskPrediction

STAND_IN_SCORE = 0.02  # below every card threshold: `auto`, never routed for uncertainty
STAND_IN_ITM = 0.99  # a confident match: the ITM gate routes nothing either


class StandInPredictor(Predictor):
    def run(self, batch: PreparedBatch) -> list[Prediction]:
        # JPEGs handed over undecoded are still decoded (on the device): that is feed work.
        decoded = self._device_pixels(batch)
        out = []
        for i, has_image in enumerate(decoded.present.tolist()):
            tasks = {}
            for task, labels in self.card.tasks.items():
                rest = STAND_IN_SCORE / (len(labels) - 1)
                probs = {labels[0]: 1 - STAND_IN_SCORE, **{label: rest for label in labels[1:]}}
                tasks[task] = TaskPrediction(
                    label=labels[0],
                    score=STAND_IN_SCORE,
                    decision=False,
                    threshold=self.card.threshold(task),
                    probs=probs,
                )
            itm = STAND_IN_ITM if has_image else None
            out.append(Prediction(tasks, itm, self.card.version, decoded.errors.get(i), decoded.found.get(i)))
        return out
