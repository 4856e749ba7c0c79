"""Training: the settings of each kind of run (:mod:`.config`) resolved once into the values every part
reads (:mod:`.resolve`), the parts a :class:`~smallm.train.trainer.Trainer` is assembled from (a task from
:mod:`.tasks`, the model from :mod:`.trainable`, the optimizer from :mod:`.optim`, checkpoints through
:mod:`.checkpointer`), the devices and ranks (:mod:`.distributed`), metrics (:mod:`.metrics`), memory and
FLOPs plans (:mod:`.memory`), and :mod:`.jobs`, which joins them per kind of run."""
