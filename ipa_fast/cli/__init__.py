"""The ``ipa-fast`` command (``main``) and its subcommands: ``generate``, ``demo``, ``bench``
(``train`` and ``setup`` live with the trainer and the embedded assets)."""
