"""Reading a finished segment OUTPUT: schema, results, COCO export, evaluation, rendering."""
