"""Hospital DICOM integration: receive studies from a PACS, send results back as DICOM SR + secondary capture.

Modules
-------
``types``     the narrow interface: ``analyse(data, accession) -> AnalysisResult | Refusal``
``pipeline``  one instance -> analysis -> result objects or a recorded refusal (``handle_instances``,
              reused by the STOW-RS route) and the STOW-RS response builder (``stow_response``)
``results``   TID 1500 Comprehensive 3D SR + Grad-CAM secondary capture (highdicom)
``spool``     durable spool of received instances (0600, fsync; recovered at start)
``sender``    C-STORE to the destination AE with retry + exponential backoff
``listener``  the pynetdicom SCP (C-ECHO, C-STORE; a study is analysed when its association ends)
``metrics``   ``cxr_dicom_*`` Prometheus metrics (in ``app.metrics.REGISTRY``)
``champion``  stop-gap ``analyse`` backed by the registry's champion (until the prediction service)
``cli``       ``cxr dicom listen``

Plugging in the prediction service
----------------------------------
Everything here depends on one callable. The prediction service provides::

    def analyse_dicom(data: bytes, accession: str | None) -> AnalysisResult | Refusal

(input gate -> ``Refusal(code, reason)`` on ``ImageRefused``; vitals looked up by ``accession``;
prediction stored, ``prediction.served`` audited, metrics recorded; Grad-CAM of the covid19
class; ``AnalysisResult`` filled from the stored prediction + the prepared image + the heatmap +
the approval of the model version). Then either change ``DEFAULT_ANALYSE`` in ``app/dicom/cli.py``
to a factory returning it (``--analyse module:factory`` selects one per deployment), or construct
``DicomListener(analyse=service.analyse_dicom, ...)`` directly; the STOW-RS route calls
``handle_instances(parts, service.analyse_dicom)``, C-STOREs each ``results`` outcome's
``objects.datasets()`` with ``sender.Sender`` (or returns them), and answers
``stow_response(outcomes)`` with status ``stow_status(outcomes)``.
"""
