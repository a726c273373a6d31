"""Tape: strictly sequential media behind one device interface (seed a.5, a.6, c.3, c.4).

* :mod:`.device` — the interface every tape drive offers (:class:`TapeDevice`), its
  errors, and :func:`open_tape`, which turns ``file:PATH`` or a device path into one;
* :mod:`.st` — the Linux ``st`` driver (``/dev/nstN``) through ``ioctl``;
* :mod:`.filetape` — a faithful file-backed tape with a time model, for tests, demos
  and benchmarks;
* :mod:`.format` — what sdbackup writes on a tape (label, generation parts) and the
  writer and scanner of that format;
* :mod:`.catalog` — the disk catalog (generation, stream offset → tape, file, block)
  and a tape set read as a medium;
* :mod:`.buffer` — the disk buffer tape blocks are read through (c.3).

Nothing above :mod:`.device` knows which implementation it drives.
"""
