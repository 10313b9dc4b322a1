package io.kubegrpc.peers;

import com.google.protobuf.CodedInputStream;
import com.google.protobuf.CodedOutputStream;
import com.google.protobuf.WireFormat;
import io.grpc.MethodDescriptor;
import io.grpc.ServerServiceDefinition;
import io.grpc.Status;
import io.grpc.health.v1.HealthCheckResponse.ServingStatus;
import io.grpc.protobuf.services.HealthStatusManager;
import io.grpc.stub.ServerCallStreamObserver;
import io.grpc.stub.ServerCalls;
import io.grpc.stub.StreamObserver;
import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.UncheckedIOException;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.ScheduledFuture;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicReference;
import java.util.logging.Logger;

/**
 * {@code kubegrpc.echo.v1.Echo}, defined by hand: byte-array methods, messages encoded with
 * protobuf-java's CodedInputStream/CodedOutputStream (field numbers as in echo/src/lib.rs).
 */
final class EchoService {
  private static final Logger logger = Logger.getLogger(EchoService.class.getName());
  static final String SERVICE = "kubegrpc.echo.v1.Echo";

  static final MethodDescriptor.Marshaller<byte[]> BYTES =
      new MethodDescriptor.Marshaller<>() {
        @Override
        public InputStream stream(byte[] value) {
          return new ByteArrayInputStream(value);
        }

        @Override
        public byte[] parse(InputStream stream) {
          try {
            return stream.readAllBytes();
          } catch (IOException e) {
            throw new UncheckedIOException(e);
          }
        }
      };

  static MethodDescriptor<byte[], byte[]> method(String name) {
    return MethodDescriptor.<byte[], byte[]>newBuilder()
        .setType(MethodDescriptor.MethodType.UNARY)
        .setFullMethodName(MethodDescriptor.generateFullMethodName(SERVICE, name))
        .setRequestMarshaller(BYTES)
        .setResponseMarshaller(BYTES)
        .build();
  }

  private final String address;
  private final Counters counters;
  private final HealthStatusManager health;
  /** Delayed replies wait here, not on a blocked thread, so that cancellation stops them. */
  private final ScheduledExecutorService timer =
      Executors.newSingleThreadScheduledExecutor(
          runnable -> {
            Thread thread = new Thread(runnable, "echo-delays");
            thread.setDaemon(true);
            return thread;
          });

  EchoService(String address, Counters counters, HealthStatusManager health) {
    this.address = address;
    this.counters = counters;
    this.health = health;
  }

  ServerServiceDefinition definition() {
    return ServerServiceDefinition.builder(SERVICE)
        .addMethod(method("Echo"), ServerCalls.asyncUnaryCall(this::echo))
        .addMethod(method("Stats"), ServerCalls.asyncUnaryCall(this::stats))
        .addMethod(method("SetHealth"), ServerCalls.asyncUnaryCall(this::setHealth))
        .build();
  }

  /**
   * EchoRequest { string message = 1; uint32 delay_ms = 2; } -> EchoReply { string message = 1;
   * string backend = 2; }
   */
  private void echo(byte[] request, StreamObserver<byte[]> responses) {
    String message = "";
    int delayMs = 0;
    try {
      CodedInputStream input = CodedInputStream.newInstance(request);
      for (int tag = input.readTag(); tag != 0; tag = input.readTag()) {
        if (isField(tag, 1, WireFormat.WIRETYPE_LENGTH_DELIMITED)) {
          message = input.readStringRequireUtf8();
        } else if (isField(tag, 2, WireFormat.WIRETYPE_VARINT)) {
          delayMs = input.readUInt32();
        } else if (!input.skipField(tag)) {
          break;
        }
      }
    } catch (IOException e) {
      responses.onError(Status.INVALID_ARGUMENT.withDescription("bad EchoRequest: " + e).asException());
      return;
    }
    String reply = message;
    Runnable answer =
        () -> {
          counters.requests.incrementAndGet();
          responses.onNext(encode(out -> {
            writeString(out, 1, reply);
            writeString(out, 2, address);
          }));
          responses.onCompleted();
        };
    if (delayMs <= 0) {
      answer.run();
      return;
    }
    ServerCallStreamObserver<byte[]> call = (ServerCallStreamObserver<byte[]>) responses;
    AtomicReference<ScheduledFuture<?>> delayed = new AtomicReference<>();
    // Set before the reply can be scheduled: with a cancel handler, a reply to a call cancelled
    // meanwhile is dropped instead of throwing.
    call.setOnCancelHandler(
        () -> {
          ScheduledFuture<?> pending = delayed.get();
          if (pending != null) {
            pending.cancel(false);
          }
        });
    delayed.set(
        timer.schedule(
            () -> {
              if (!call.isCancelled()) {
                answer.run();
              }
            },
            Integer.toUnsignedLong(delayMs),
            TimeUnit.MILLISECONDS));
  }

  /**
   * StatsReply { uint64 requests = 1; connections_accepted = 2; connections_open = 3;
   * health_watches_open = 4; health_checks = 5; too_many_pings = 6; }
   */
  private void stats(byte[] request, StreamObserver<byte[]> responses) {
    responses.onNext(
        encode(
            out -> {
              writeUInt64(out, 1, counters.requests.get());
              writeUInt64(out, 2, counters.connectionsAccepted.get());
              writeUInt64(out, 3, Math.max(0, counters.connectionsOpen.get()));
              writeUInt64(out, 4, Math.max(0, counters.healthWatchesOpen.get()));
              writeUInt64(out, 5, counters.healthChecks.get());
              writeUInt64(out, 6, counters.tooManyPings.get());
            }));
    responses.onCompleted();
  }

  /** SetHealthRequest { string service = 1; bool serving = 2; } -> SetHealthReply {} */
  private void setHealth(byte[] request, StreamObserver<byte[]> responses) {
    String service = "";
    boolean serving = false;
    try {
      CodedInputStream input = CodedInputStream.newInstance(request);
      for (int tag = input.readTag(); tag != 0; tag = input.readTag()) {
        if (isField(tag, 1, WireFormat.WIRETYPE_LENGTH_DELIMITED)) {
          service = input.readStringRequireUtf8();
        } else if (isField(tag, 2, WireFormat.WIRETYPE_VARINT)) {
          serving = input.readBool();
        } else if (!input.skipField(tag)) {
          break;
        }
      }
    } catch (IOException e) {
      responses.onError(
          Status.INVALID_ARGUMENT.withDescription("bad SetHealthRequest: " + e).asException());
      return;
    }
    ServingStatus status = serving ? ServingStatus.SERVING : ServingStatus.NOT_SERVING;
    health.setStatus(service, status);
    logger.info("health of \"" + service + "\" set to " + status);
    responses.onNext(new byte[0]);
    responses.onCompleted();
  }

  // === protobuf wire format by hand (proto3: default values are not written) ===

  private static boolean isField(int tag, int field, int wireType) {
    return WireFormat.getTagFieldNumber(tag) == field && WireFormat.getTagWireType(tag) == wireType;
  }

  private interface Writer {
    void write(CodedOutputStream out) throws IOException;
  }

  private static byte[] encode(Writer writer) {
    try {
      ByteArrayOutputStream bytes = new ByteArrayOutputStream();
      CodedOutputStream out = CodedOutputStream.newInstance(bytes);
      writer.write(out);
      out.flush();
      return bytes.toByteArray();
    } catch (IOException e) {
      throw new UncheckedIOException(e);
    }
  }

  private static void writeString(CodedOutputStream out, int field, String value)
      throws IOException {
    if (!value.isEmpty()) {
      out.writeString(field, value);
    }
  }

  private static void writeUInt64(CodedOutputStream out, int field, long value)
      throws IOException {
    if (value != 0) {
      out.writeUInt64(field, value);
    }
  }
}
