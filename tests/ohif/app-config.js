/** OHIF v3 configuration of the viewer harness (tests/ohif.py serves it as /app-config.js).
 *
 * One DICOMweb data source on the page's own origin: tests/ohif.py proxies /dicom-web/*
 * to the test's Orthanc, so there is no CORS and no OIDC. Orthanc DICOMweb 1.7 answers
 * 400 to single-part bulk data requests: singlepart is off, everything is multipart.
 */
const origin = window.location.origin;

window.config = {
  name: 'medgemma-node viewer harness',
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  // the CI machine has two cores
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  maxNumRequests: { interaction: 20, thumbnail: 10, prefetch: 5 },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc under test',
        name: 'orthanc',
        wadoUriRoot: `${origin}/dicom-web`,
        qidoRoot: `${origin}/dicom-web`,
        wadoRoot: `${origin}/dicom-web`,
        qidoSupportsIncludeField: false,
        supportsReject: false,
        supportsStow: false,
        dicomUploadEnabled: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        singlepart: false,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
