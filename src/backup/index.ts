/** Backup images: the qcow2 writer and reader, the manifest, and chain verification. */
export {
  createQcow2Writer,
  DEFAULT_CLUSTER_SIZE,
  PARTIAL_SUFFIX,
  type Qcow2Writer,
  type Qcow2WriterOptions,
  type Qcow2WriteResult,
} from './qcow2-writer.js';
export {
  openImage,
  openQcow2,
  Qcow2Image,
  RawImage,
  resolveBackingPath,
  type ClusterKind,
  type ClusterRun,
  type ImageDevice,
  type OpenImageOptions,
} from './qcow2-reader.js';
export {
  decodeManifest,
  manifestPathOf,
  readManifest,
  ManifestError,
  MANIFEST_VERSION,
  type BackupMetadata,
  type Manifest,
  type ManifestBody,
} from './manifest.js';
export { Qcow2FormatError, type Qcow2Header } from './qcow2-format.js';
export {
  verifyChain,
  type VerifiedImage,
  type VerifyOptions,
  type VerifyProblem,
  type VerifyReport,
} from './verify.js';
export {
  DEFAULT_RESTORE_CHUNK_BYTES,
  restoreChain,
  RestoreError,
  type RestoreOptions,
  type RestoreProgress,
  type RestoreResult,
  type RestoreTargetKind,
} from './restore.js';
