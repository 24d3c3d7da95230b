"""Release gates (marker ``accuracy``): MMLU / C-Eval 5-shot through the precision harness.

The precision harness and its gates are the subject of their own issue; this
package holds their tests once that lands.
"""
