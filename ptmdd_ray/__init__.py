"""ptmdd_ray: PTM-guided dataset distillation (DC, DSA, DM + CLoM/CCLoM) as a Ray service.

Lu et al., "Can pre-trained models assist in dataset distillation?" (2023) add pre-trained models
as supervision for distillation. This package implements the methods and losses (:mod:`methods`,
:mod:`losses`), a content-addressed PTM checkpoint store (:mod:`store`, :mod:`pool`), the evaluation
protocol (:mod:`evaluate`) and the ``ptmdd`` command line (:mod:`cli`), all driven by one validated
:class:`~ptmdd_ray.config.Config`.
"""
__version__ = "0.1.0"
