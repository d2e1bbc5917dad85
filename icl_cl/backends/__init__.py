"""LLM backends behind one protocol (:mod:`icl_cl.backends.base`); build one by name with
:func:`icl_cl.backends.registry.create_backend`. Nothing is imported here, so that naming a
backend never loads another's libraries."""
