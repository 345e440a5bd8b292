"""The compiled twins of the page-state core (built by setup.py, absent if the build failed).

``segments`` and ``pages`` here are Cython "pure Python mode" compilations of
``asyncpgalloc/segments.py`` and ``asyncpgalloc/pages.py`` — the same source, so the same
behaviour. Import them through ``asyncpgalloc.core``, which picks one implementation.
"""
