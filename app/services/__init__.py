"""Services behind the interfaces: what a prediction *is*, whichever door it came through.

* ``app.services.champion`` — which model is served (the champion holder, atomic switch);
* ``app.services.predictions`` — one prediction service: input gate (decode, refusals), inference,
  warnings, the stored row, the audit entry, the metrics. The REST route, DICOMweb STOW-RS and the
  DICOM listener all call it.
"""
