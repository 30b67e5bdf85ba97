"""Data: vocabularies, seqio tasks, the document segmenter and the prefetching batch pipeline.

Importing ``fot.data`` is light: TensorFlow and seqio are imported lazily inside the functions
that need them (``fot.data.tasks``, ``fot.data.sources``, ``fot.data.vocab``). The segmenter
(``fot.data.segmenter``) and the prefetching iterator (``fot.data.pipeline.PrefetchIterator``)
are pure numpy.
"""
