"""The CDKTF stack that deploys CFlow on Google Cloud, and the VM bootstrap scripts it ships.

One construct per concern (``storage``, ``messaging``, ``identity``, ``network``, ``compute``,
``package``), wired together in ``stack``; ``main`` is the ``app`` of ``cdktf.json``.
"""

from infra import provider

provider.register()  # before any module here imports a resource of the Google provider
