"""Helpers shared by the labeler, the trainer and ``softlabels convert``; not part of the format.

* :mod:`softlabels.common.cli`: running a command (user errors as one line), flags.
* :mod:`softlabels.common.settings`: ``--config`` files, read within bounds and typed like flags.
* :mod:`softlabels.common.commit`: the writer side of the commit protocol (shards, markers, manifest last).
* :mod:`softlabels.common.files`: publishing files whole; file modes on shared volumes.
* :mod:`softlabels.common.crash`: named crash points for fault-injection tests.
* :mod:`softlabels.common.plot`: matplotlib on the file backend, imported lazily.
* :mod:`softlabels.common.malloc`: large freed buffers kept in the process (glibc), not page-faulted afresh.

:mod:`softlabels.schemas` never imports this package.
"""
