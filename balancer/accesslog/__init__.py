"""Access log: one line per request, written off the hot path.

* `records`: the record, a plain tuple in a documented field order;
* `reference`: the formats' definition (``combined``, ``json``), any record;
* `fast`: the same bytes for the common case, faster;
* `formats`: the formatters by name;
* `writer`: `AccessLog`, which queues records and writes them in batches.
"""

from balancer.accesslog.formats import FORMATS, FORMATTERS, format_combined, format_json
from balancer.accesslog.records import FIELD_COUNT, make_record
from balancer.accesslog.writer import OFF, STDOUT, AccessLog, AccessLogError

__all__ = ["FIELD_COUNT", "FORMATS", "FORMATTERS", "OFF", "STDOUT", "AccessLog",
           "AccessLogError", "format_combined", "format_json", "make_record"]
