package io.kubegrpc.peers;

import io.grpc.ForwardingServerCall.SimpleForwardingServerCall;
import io.grpc.ForwardingServerCallListener.SimpleForwardingServerCallListener;
import io.grpc.Metadata;
import io.grpc.ServerCall;
import io.grpc.ServerCallHandler;
import io.grpc.ServerInterceptor;
import io.grpc.Status;
import java.util.concurrent.atomic.AtomicBoolean;

/** Counts Health/Check calls and Health/Watch streams open now. */
final class HealthCountingInterceptor implements ServerInterceptor {
  private final Counters counters;

  HealthCountingInterceptor(Counters counters) {
    this.counters = counters;
  }

  @Override
  public <ReqT, RespT> ServerCall.Listener<ReqT> interceptCall(
      ServerCall<ReqT, RespT> call, Metadata headers, ServerCallHandler<ReqT, RespT> next) {
    switch (call.getMethodDescriptor().getFullMethodName()) {
      case "grpc.health.v1.Health/Check" -> {
        counters.healthChecks.incrementAndGet();
        return next.startCall(call, headers);
      }
      case "grpc.health.v1.Health/Watch" -> {
        counters.healthWatchesOpen.incrementAndGet();
        AtomicBoolean ended = new AtomicBoolean();
        Runnable end =
            () -> {
              if (ended.compareAndSet(false, true)) {
                counters.healthWatchesOpen.decrementAndGet();
              }
            };
        ServerCall<ReqT, RespT> counted =
            new SimpleForwardingServerCall<>(call) {
              @Override
              public void close(Status status, Metadata trailers) {
                end.run();
                super.close(status, trailers);
              }
            };
        try {
          return new SimpleForwardingServerCallListener<>(next.startCall(counted, headers)) {
            @Override
            public void onCancel() {
              end.run();
              super.onCancel();
            }

            @Override
            public void onComplete() {
              end.run();
              super.onComplete();
            }
          };
        } catch (RuntimeException e) {
          end.run();
          throw e;
        }
      }
      default -> {
        return next.startCall(call, headers);
      }
    }
  }
}
